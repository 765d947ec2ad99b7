"""Built-in data for the demo models, written for this project: a labelled sentiment set (reviews of films,
food, products, places, services, books, games and apps, in many shapes: short and long, plain and negated)
and, for the quick generator, a small multilingual corpus with multi-byte UTF-8 (accents, CJK, emoji) so that
tests exercise byte-level tokens that split characters."""

from __future__ import annotations

POSITIVE = """\
An absolute delight from the first scene to the last.
The acting is superb and the story kept me hooked all evening.
I laughed, I cried, and I would happily watch it again tomorrow.
A warm, funny and beautifully shot film.
One of the best movies I have seen this year.
The soundtrack is gorgeous and fits every moment perfectly.
Clever writing, sharp dialogue and a lead performance to remember.
It is rare for a sequel to beat the original, but this one does.
The kids loved it and, honestly, so did I.
A moving story told with real care and restraint.
The plot twists were genuinely surprising and well earned.
Smart, stylish and never boring.
I was smiling the whole way through.
The cast has wonderful chemistry together.
A small masterpiece that deserves a much bigger audience.
The director handles the quiet moments with great sensitivity.
Visually stunning and emotionally rich.
Not a single wasted minute in over two hours.
This documentary taught me so much and never felt like a lecture.
The animation is breathtaking and the humour works for every age.
Best pizza in town, with a perfectly crisp crust.
The staff were friendly and the food arrived quickly.
Every dish was fresh, tasty and generously portioned.
A lovely little café with excellent coffee and homemade cakes.
The soup was rich and full of flavour.
We had a fantastic dinner and the dessert was heavenly.
Great value for money and the portions are huge.
The waiter gave us excellent recommendations.
Cozy atmosphere, attentive service and delicious pasta.
I will definitely come back to try the rest of the menu.
The sushi was the freshest I have had outside Japan.
Their vegetarian options are creative and satisfying.
The bread is baked every morning and you can taste it.
A perfect spot for a relaxed Sunday brunch.
The curry had just the right amount of heat.
This blender is powerful, quiet and easy to clean.
The battery easily lasts two full days.
Setup took five minutes and everything worked out of the box.
Excellent build quality, it feels solid and premium.
The headphones sound amazing and block out the noise on the train.
Shipping was fast and the package was well protected.
It does exactly what it promises, and does it well.
The screen is bright and sharp, even in direct sunlight.
I have used this kettle every day for a year and it still works like new.
Comfortable shoes that I can wear all day without any pain.
The camera takes beautiful photos in low light.
A sturdy backpack with plenty of clever pockets.
This vacuum picks up everything, even pet hair on the carpet.
The customer support team solved my problem within minutes.
Easily the most comfortable chair I have ever owned.
The printer connected to the wifi on the first try.
Lightweight, fast and a pleasure to type on.
The hotel room was spotless and the bed was very comfortable.
Beautiful views from the balcony and a quiet neighbourhood.
The guided tour was informative and a lot of fun.
Our host went out of her way to make us feel welcome.
The beach was clean and the water was crystal clear.
Check-in was smooth and the staff spoke several languages.
A charming old town with great little shops and restaurants.
The train was punctual, clean and comfortable.
We loved every minute of our stay and cannot wait to return.
The museum is well organised and the exhibits are fascinating.
The hike was challenging but the views at the top were worth it.
Excellent location, just a short walk from the station.
The spa was relaxing and the therapists were very skilled.
I could not put this book down.
The characters feel real and the ending is deeply satisfying.
Beautifully written, with prose that is a joy to read.
A gripping thriller with a twist I never saw coming.
This cookbook has become my favourite in the kitchen.
The author explains difficult ideas with great clarity.
A heartwarming story that stayed with me for days.
The illustrations are wonderful and my daughter adores them.
Well researched, balanced and surprisingly entertaining.
The audiobook narrator does a brilliant job with the voices.
The game is addictive in the best possible way.
Gorgeous levels, tight controls and a great soundtrack.
The puzzles are clever without ever feeling unfair.
Playing online with friends has been a blast.
The developers keep improving it with free updates.
This app saves me time every single day.
The interface is clean and intuitive.
Syncing between my phone and laptop works flawlessly.
The update made everything faster and smoother.
A simple tool that does one thing and does it perfectly.
The concert was electric and the band sounded incredible.
Her new album is her most personal and her best.
The orchestra played with such energy and precision.
The play was hilarious and the actors were brilliant.
Tickets were cheap and the seats had a great view.
Our plumber was on time, tidy and reasonably priced.
The course was well structured and the teacher was inspiring.
My new dentist is gentle, patient and very thorough.
The gym is clean, spacious and never too crowded.
The repair shop fixed my bike the same day.
The delivery driver was polite and careful with the parcel.
The bank resolved the mistake quickly and apologised.
The mechanic explained everything clearly and did not overcharge.
The wedding photographer captured every special moment.
The moving company was efficient and nothing was damaged.
Not bad at all, in fact it was really good.
I did not expect much, but it turned out to be wonderful.
There is nothing I would change about it.
I have no complaints whatsoever.
It never fails to cheer me up.
Honestly better than I hoped.
Highly recommended.
Loved it.
Five stars, no question.
Worth every penny.
Simply wonderful.
What a pleasant surprise!
Absolutely fantastic service.
A joy to use.
Pure brilliance.
I am very happy with this purchase.
It exceeded all my expectations.
The team did an outstanding job.
Great experience from start to finish.
I would recommend it to anyone.
This made my week.
Such a thoughtful and generous gesture from the staff.
The garden is peaceful and beautifully kept.
Our flight landed early and the crew were lovely.
The new bakery down the street makes the best croissants I have ever tasted.
The tomatoes from this market are sweet and full of flavour.
Dinner at the little bistro was the highlight of our trip.
The service was quick, warm and professional.
The crème brûlée alone is worth the visit.
A naïve little comedy, but so sweet that I enjoyed every minute.
The lecture was engaging and I learned a lot.
My phone charges incredibly fast with this adapter.
The sofa arrived early and it is even nicer in person.
The washing machine is quiet and the clothes come out spotless.
A gentle, funny and wise film about growing old.
The festival was well organised and the crowd was friendly.
The jacket keeps me warm and dry even in heavy rain.
Our tour guide was knowledgeable, patient and funny.
The pancakes were fluffy and the coffee was strong.
The podcast is thoughtful, well produced and always interesting.
The software update fixed every bug I had reported.
The nurse was kind and made me feel at ease.
Everything about this trip was perfect.
The new park is a wonderful place for families.
A refreshing and original take on a familiar story.
The ramen broth was deep, rich and comforting.
I keep coming back because the quality never drops.
The instructions were clear and assembly was painless.
Brilliant performances across the whole cast.
It is the kind of place that makes you feel at home.
The seller answered my questions quickly and honestly.
The ending made me want to stand up and cheer.
Solid, reliable and beautifully designed.
The view of the sunset from the terrace was unforgettable.
This little speaker fills the whole room with rich sound.
"""

NEGATIVE = """\
A dull, lifeless film that I struggled to finish.
The plot makes no sense and the acting is wooden.
Two hours of my life I will never get back.
The jokes fall flat and the pacing is painfully slow.
I walked out halfway through.
A lazy sequel that adds nothing to the original.
The dialogue is clumsy and the characters are paper thin.
The special effects look cheap and dated.
Predictable from the first minute to the last.
The ending was rushed and completely unsatisfying.
Loud, confusing and strangely boring.
Even the talented cast cannot save this mess.
The soundtrack is so loud that you cannot hear the actors.
I expected much more from such a famous director.
The documentary is one-sided and poorly researched.
A pretentious film that mistakes slowness for depth.
The story drags on and on without going anywhere.
The humour is mean-spirited and not funny.
The camera work made me feel seasick.
It is a forgettable film with nothing new to say.
The food was cold and tasteless.
We waited over an hour for our main course.
The waiter was rude and ignored us all evening.
Overpriced, greasy and bland.
The fish smelled off and I could not eat it.
The restaurant was dirty and the tables were sticky.
My order was wrong and nobody apologised.
The coffee tasted burnt and the cake was stale.
Tiny portions at ridiculous prices.
The pasta was overcooked and swimming in oil.
I got food poisoning after eating there.
The music was so loud that we could not talk.
They charged us for dishes we never ordered.
The soup was watery and far too salty.
The pizza arrived soggy and half an hour late.
The blender broke after two weeks.
The battery barely lasts half a day.
It stopped working the day after the warranty expired.
Cheap plastic that cracked the first time I dropped it.
The headphones hurt my ears and the sound is tinny.
The package arrived damaged and parts were missing.
It does not do half of what the description promises.
The screen is dim and full of dead pixels.
The kettle started leaking within a month.
These shoes gave me blisters on the first day.
The photos are blurry and full of noise.
The zip on the backpack broke on my first trip.
The vacuum is loud and barely picks anything up.
Customer support kept me on hold for an hour and then hung up.
The chair wobbles and the cushion is rock hard.
The printer refuses to connect and jams constantly.
The keyboard misses letters and the keys stick.
The hotel room smelled of smoke and the sheets were stained.
The walls were so thin that we heard everything next door.
The tour was rushed and the guide seemed bored.
Our host never answered our messages.
The beach was covered in litter.
Check-in took an hour and our room was not ready.
The town was overcrowded, expensive and noisy.
The train was cancelled and nobody told us why.
We were miserable for the whole stay.
Half of the museum was closed for renovation.
The trail was badly marked and we got lost twice.
The location is far from everything and the area felt unsafe.
The pool was closed and the gym equipment was broken.
I gave up on this book after fifty pages.
The characters are flat and the ending is absurd.
Clumsy prose full of clichés.
The so-called thriller has no suspense at all.
Half of the recipes in this cookbook simply do not work.
The author rambles and never gets to the point.
A depressing story with no reason to care about anyone.
The print is tiny and the pages fell out.
Full of factual errors and sloppy editing.
The narrator reads in a flat monotone that put me to sleep.
The game crashes every few minutes.
Ugly graphics, clunky controls and a forgettable soundtrack.
The puzzles are frustrating and the hints are useless.
The online mode is full of cheaters and lag.
They keep adding paid extras instead of fixing bugs.
The app drains my battery and keeps freezing.
The interface is confusing and cluttered.
My data disappeared after the last sync.
The update made everything slower and broke my settings.
It is bloated with ads and constant notifications.
The concert started two hours late and the sound was awful.
Her new album is dull and repetitive.
The orchestra was out of tune all evening.
The play was boring and the actors forgot their lines.
The tickets were expensive and the view was blocked by a pillar.
The plumber never showed up and did not call.
The course was disorganised and the teacher was unprepared.
The dentist was rough and the bill was outrageous.
The gym is dirty, crowded and half the machines are broken.
The repair shop kept my bike for a month and it still squeaks.
The delivery driver threw the parcel over the fence.
The bank charged me fees for their own mistake.
The mechanic overcharged me and the problem came back.
The photographer missed half of the important moments.
The movers broke our mirror and scratched the table.
Not good, not even close.
I really wanted to like it, but I could not.
There is nothing I would recommend about it.
I have nothing but complaints.
It never works when I need it.
Much worse than I feared.
Avoid at all costs.
Hated it.
One star is too generous.
A complete waste of money.
Simply terrible.
What a disappointment.
Absolutely awful service.
A pain to use.
Utter rubbish.
I am very unhappy with this purchase.
It fell far short of my expectations.
The team did a sloppy job.
A bad experience from start to finish.
I would not recommend it to anyone.
This ruined my week.
The staff were dismissive and unhelpful.
The garden was overgrown and full of rubbish.
Our flight was delayed for six hours without any explanation.
The new bakery sells dry croissants that taste of cardboard.
The vegetables from this market were already rotten.
Dinner at the bistro was the low point of our trip.
The service was slow, cold and careless.
The crème brûlée was runny and the sugar was burnt.
A naïve and silly comedy that is not funny at all.
The lecture was dull and I learned nothing.
This charger gets dangerously hot and charges slowly.
The sofa arrived late and the fabric was already torn.
The washing machine is noisy and leaves stains on the clothes.
A cynical, joyless film that wastes a great premise.
The festival was chaotic and the queues were endless.
The jacket soaked through in the first light shower.
Our guide was late, rude and clearly did not know the place.
The pancakes were rubbery and the coffee was weak.
The podcast is full of ads and the hosts talk over each other.
The software update introduced more bugs than it fixed.
The receptionist was rude and made us wait for nothing.
Everything about this trip went wrong.
The new park is already neglected and covered in graffiti.
A tired and unoriginal take on a familiar story.
The ramen broth was bland and the noodles were soggy.
The quality has gone downhill and I will not be back.
The instructions were useless and two screws were missing.
Wooden performances across the whole cast.
It is the kind of place that makes you want to leave immediately.
The seller ignored my questions and sent the wrong item.
The ending made me want to throw the remote at the screen.
Flimsy, unreliable and badly designed.
The view from our room was a concrete wall.
This speaker crackles and distorts at any volume.
"""

SENTIMENT: list[tuple[str, str]] = [(line, "positive") for line in POSITIVE.splitlines() if line.strip()] + [
    (line, "negative") for line in NEGATIVE.splitlines() if line.strip()
]

# For the quick generator: small, multilingual, with accents, CJK and emoji (each of which byte-level BPE may
# split into several tokens), so that streaming detokenization is tested on characters cut between tokens.
QUICK_CORPUS = """\
Return the number of items in a container.
<|endoftext|>
Return a new list containing all items from the iterable in ascending order.
<|endoftext|>
Le café est très bon, et la crème brûlée est délicieuse. Voilà, c'est déjà l'été à Besançon.
<|endoftext|>
Über den Wolken muss die Freiheit wohl grenzenlos sein. Schöne Grüße aus Köln und München.
<|endoftext|>
¿Dónde está la estación? El niño comió piña en la mañana. Ação, coração e informação em São Paulo.
<|endoftext|>
東京は日本の首都です。今日はいい天気ですね。私は本を読むのが好きです。
<|endoftext|>
北京是中国的首都。我喜欢学习中文和写代码。你好，世界！
<|endoftext|>
서울은 한국의 수도입니다. 안녕하세요, 반갑습니다.
<|endoftext|>
Москва — столица России. Привет, мир! Ελληνικά: καλημέρα κόσμε.
<|endoftext|>
Emoji everywhere: 🎉🚀✨ launch day! 😀😃😄 smiles, 👍🏽 thumbs up, 👨‍👩‍👧 family, 🇫🇷 flag, ❤️ love.
<|endoftext|>
Mathematics: ∑ x² ≤ ∞, π ≈ 3.14159, α + β = γ, √2 ≠ 1.5, 10 µs → 10⁻⁵ s.
<|endoftext|>
Open the file and return a stream. Raise OSError upon failure. The mode defaults to 'r'.
<|endoftext|>
Split the string at the separator and return a list of the words. If sep is not given, split on whitespace.
<|endoftext|>
Return True if the object is callable, False otherwise. Classes are callable, as are functions and methods.
<|endoftext|>
The naïve résumé of the façade: coöperate, jalapeño, Zürich, Kraków, Ångström, Dvořák.
<|endoftext|>
日本語と English と français が混ざった文章 🎌 です。漢字、ひらがな、カタカナ。
<|endoftext|>
Compute the greatest common divisor of the integer arguments. gcd() with no arguments returns 0.
<|endoftext|>
Format a string with the given arguments: "{} → {}".format("α", "ω") gives "α → ω" 🙂.
<|endoftext|>
"""
